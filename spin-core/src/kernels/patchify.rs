//! Cutting NCHW images into non-overlapping P×P patches and back, as copies of P-value runs.
//!
//! Patch row (b, r, q) holds `(cin, py, px)`: for each (ci, py) the P values of image row
//! r·P + py from column q·P on, which lie next to each other in NCHW. One task per (b, r) copies
//! those runs; an index per element (8 bytes for each 4-byte value, built on one thread) cost more
//! than the copy.
use rayon::prelude::*;

/// Sizes of one patchify: images, input channels, height, width, patch side.
#[derive(Clone, Copy, Debug)]
pub struct PatchGeometry {
    /// Images.
    pub b: usize,
    /// Input channels.
    pub cin: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Patch side.
    pub p: usize,
}

impl PatchGeometry {
    /// Values per patch row, `cin·P·P`.
    pub fn patch_len(&self) -> usize {
        self.cin * self.p * self.p
    }

    /// Calls `run(image offset, patch offset)` for every P-value run of patch-grid row `row`
    /// (b, r): offsets into the NCHW image and into that grid row's `(W/P, cin·P·P)` patches.
    fn runs(&self, row: usize, mut run: impl FnMut(usize, usize)) {
        let (hp, wp, p) = (self.h / self.p, self.w / self.p, self.p);
        let (b, r) = (row / hp, row % hp);
        for q in 0..wp {
            for ci in 0..self.cin {
                for py in 0..p {
                    let src = ((b * self.cin + ci) * self.h + r * p + py) * self.w + q * p;
                    run(src, q * self.patch_len() + (ci * p + py) * p);
                }
            }
        }
    }
}

/// `x` `(B, Cin, H, W)` into `out` `(B·(H/P)·(W/P), Cin·P·P)`.
pub fn patchify_into<E: Copy + Send + Sync>(g: &PatchGeometry, x: &[E], out: &mut [E]) {
    assert!(
        x.len() == g.b * g.cin * g.h * g.w && out.len() == x.len(),
        "patchify: sizes"
    );
    let grid_row = (g.w / g.p) * g.patch_len();
    if grid_row == 0 {
        return;
    }
    out.par_chunks_mut(grid_row).enumerate().for_each(|(row, o)| {
        g.runs(row, |src, dst| o[dst..][..g.p].copy_from_slice(&x[src..][..g.p]));
    });
}

/// The adjoint of [`patchify_into`]: adds each patch value `gy` back onto its image element `gx`.
pub fn unpatchify_add<E: Copy + Send + Sync + std::ops::AddAssign>(
    g: &PatchGeometry,
    gy: &[E],
    gx: &mut [E],
) {
    assert!(
        gx.len() == g.b * g.cin * g.h * g.w && gy.len() == gx.len(),
        "unpatchify: sizes"
    );
    let grid_row = (g.w / g.p) * g.patch_len();
    // Patches do not overlap, so each image element receives exactly one value; grid rows are
    // taken one after another because an image's grid rows interleave within each channel.
    for (row, gys) in gy.chunks(grid_row.max(1)).enumerate() {
        g.runs(row, |src, dst| {
            for (a, &v) in gx[src..][..g.p].iter_mut().zip(&gys[dst..][..g.p]) {
                *a += v;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both directions against the definition, out[(b·H/P + r)·W/P + q][(ci·P + py)·P + px] =
    /// x[b][ci][r·P + py][q·P + px], on 2 images of 2 channels, 6 × 9 pixels, patches of 3.
    #[test]
    fn runs_match_the_definition() {
        let g = PatchGeometry {
            b: 2,
            cin: 2,
            h: 6,
            w: 9,
            p: 3,
        };
        let x: Vec<f64> = (0..g.b * g.cin * g.h * g.w).map(|i| i as f64).collect();
        let mut out = vec![f64::NAN; x.len()];
        patchify_into(&g, &x, &mut out);
        let (hp, wp, p) = (g.h / g.p, g.w / g.p, g.p);
        let mut back = vec![0.5; x.len()];
        unpatchify_add(&g, &out, &mut back);
        for b in 0..g.b {
            for (r, q, ci, py, px) in (0..hp * wp * g.cin * p * p).map(|i| {
                (
                    i / (wp * g.cin * p * p),
                    i / (g.cin * p * p) % wp,
                    i / (p * p) % g.cin,
                    i / p % p,
                    i % p,
                )
            }) {
                let src = ((b * g.cin + ci) * g.h + r * p + py) * g.w + q * p + px;
                let row = (b * hp + r) * wp + q;
                assert_eq!(out[row * g.patch_len() + (ci * p + py) * p + px], x[src]);
                assert_eq!(back[src], x[src] + 0.5);
            }
        }
    }
}
