use spin_core::prelude::*;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10, depth = 4)]
#[fips(groups = [[0, 1], [1, 4]], budget = 0.5, sparsity = 0.75)]
struct GroupsDoNotPartition;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10, depth = 4)]
#[fips(groups = [[0, 1, 2], [3]], budget = 0.5)]
struct UnequalGroups;

#[fips(groups = [[0, 1], [2, 3]], budget = 1.5, sparsity = 0.75)]
#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10, depth = 4)]
struct BudgetAboveOne;

#[vit(dim = 64, heads = 4, patch = 16, image = 224, classes = 10)]
#[shared_blocks(depth = 4, groups = 2, pattern = sequential)]
#[fips(groups = [[0, 1], [2, 3]], budget = 0.5)]
struct FipsOnASharedModel;

#[convmixer(dim = 64, kernel = 5, patch = 2, image = 32, classes = 10, depth = 4)]
#[fips(groups = [[0, 1], [2, 3]], budget = 0.5)]
struct FipsOnAConvMixer;

fn main() {}
