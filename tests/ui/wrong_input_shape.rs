use spin_core::prelude::*;

#[convmixer(dim = 16, kernel = 3, patch = 2, image = 32, classes = 10, depth = 2)]
struct Mixer;

fn main() {
    let dev = Cpu::default();
    let m = dev.build_module::<Mixer, f32>();
    // Declared for 32×32 images: a 28×28 batch does not type-check.
    let x: Tensor<Rank4<1, 3, 28, 28>, f32, _> = dev.zeros();
    let _ = m.forward(x);
}
