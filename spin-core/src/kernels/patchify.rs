//! Cutting NCHW images into non-overlapping P×P patches, as a gather index.

/// For each output element of [`crate::device::PatchifyKernel::patchify`], the flat NCHW index it reads.
pub fn patch_index(bn: usize, cin: usize, h: usize, w: usize, p: usize) -> Vec<usize> {
    let (hp, wp) = (h / p, w / p);
    let mut idx = Vec::with_capacity(bn * cin * h * w);
    for b in 0..bn {
        for r in 0..hp {
            for q in 0..wp {
                for ci in 0..cin {
                    for py in 0..p {
                        for px in 0..p {
                            idx.push(((b * cin + ci) * h + r * p + py) * w + q * p + px);
                        }
                    }
                }
            }
        }
    }
    idx
}
