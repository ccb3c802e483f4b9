use spin_core::prelude::*;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10, depth = 4, width = 3)]
struct UnknownArgument;

#[convmixer(dim = 64, patch = 2, image = 32, classes = 10, depth = 4)]
struct MissingKernel;

#[convmixer(dim = 64, kernel = 4, patch = 2, image = 32, classes = 10, depth = 4)]
struct EvenKernel;

#[vit(dim = 64, heads = 6, patch = 16, image = 224, classes = 10, depth = 4)]
struct HeadsDoNotDivideDim;

#[vit(dim = 64, heads = 4, patch = 15, image = 224, classes = 10, depth = 4)]
struct PatchDoesNotTile;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10, act = swish, depth = 4)]
struct UnknownActivation;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10, depth = 4, crop_pct = 1.2, crop_mode = edge)]
struct BadEvalTransform;

fn main() {}
