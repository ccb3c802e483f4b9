//! timm's layers on the device ops: [`functional`] forms on runtime shapes (the math every model
//! shares), parameter holders with PyTorch's shapes ([`layers`]), their initialisation
//! ([`init`]), how models expose tensors ([`param`]) and store parts shared across layers
//! ([`storage`]).
pub mod functional;
pub mod init;
pub mod layers;
pub mod param;
pub mod storage;
