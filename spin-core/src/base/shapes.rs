//! The runtime shapes spin's layers compute on. Models fix their shapes in the type and convert
//! to these at the boundary, so the heavy code is compiled once per dtype and device.

/// `(rows, features)`: a batch of tokens or pixels, channels last.
pub type Mat = (usize, usize);

/// `(batch, height, width, channels)`: a feature map channels last, as the depthwise kernels take it.
pub type Nhwc = (usize, usize, usize, usize);

/// `(batch, channels, height, width)`: images as PyTorch lays them out, the input of every model.
pub type Nchw = (usize, usize, usize, usize);
