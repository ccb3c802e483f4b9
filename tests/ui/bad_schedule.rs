use spin_core::prelude::*;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10)]
#[shared_blocks(depth = 4, groups = 8, pattern = strided)]
struct MoreGroupsThanLayers;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10)]
#[shared_blocks(depth = 10, groups = 4, pattern = sequential)]
struct NotDivisible;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10)]
#[shared_blocks(depth = 4, groups = 2, pattern = [0, 1, 0])]
struct ListTooShort;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10)]
#[shared_blocks(depth = 4, groups = 3, pattern = [0, 1, 1, 0])]
struct GroupUnused;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10)]
#[shared_blocks(depth = 4, groups = 2, pattern = sequential, share = pointwise)]
struct WrongShareForFamily;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10)]
#[shared_blocks(groups = 2, pattern = strided)]
struct NoDepth;

fn main() {}
