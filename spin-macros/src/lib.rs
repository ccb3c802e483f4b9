//! The attributes that declare spin models. Each declaration becomes a dfdx model type whose
//! tensor shapes are fixed in the type:
//!
//! ```ignore
//! #[convmixer(dim = 768, kernel = 7, patch = 7, image = 224, classes = 1000, act = relu)]
//! #[shared_blocks(depth = 32, groups = 8, pattern = strided)]
//! pub struct WsConvMixer768;
//! ```
//!
//! The crate parses arguments into a typed config (`ast`), checks them with errors that point at
//! the offending argument (`valid`, with the rules of `spin-rules`, which spin-core uses too),
//! then writes a short expansion that only names spin-core's `__private` facade (`expand`); no
//! model logic lives here.
mod ast;
mod expand;
mod valid;

use proc_macro::TokenStream;

/// Declares a ConvMixer: `#[convmixer(dim, kernel, patch, image, classes, act = gelu|relu,
/// variant = timm|spin, depth, name = "...")]` on a unit struct, optionally with
/// `#[shared_blocks(...)]`.
#[proc_macro_attribute]
pub fn convmixer(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::family(ast::FamilyKind::ConvMixer, args.into(), item.into()).into()
}

/// Declares a ViT/DeiT: `#[vit(dim, heads, patch, image, classes, mlp_ratio = 4, depth,
/// name = "...")]` on a unit struct, optionally with `#[shared_blocks(...)]`.
#[proc_macro_attribute]
pub fn vit(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::family(ast::FamilyKind::Vit, args.into(), item.into()).into()
}

/// `#[shared_blocks(depth = D, groups = G, pattern = P, share = S)]`: D layers whose parameters
/// live in G groups, layer i using group `schedule[i]`. With a family attribute it sets the
/// sharing of that model; alone, on `struct Trunk(Block);`, it declares a trunk of D blocks.
#[proc_macro_attribute]
pub fn shared_blocks(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::shared_blocks(args.into(), item.into()).into()
}

/// `#[fips(groups = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], budget = 0.5, sparsity = 0.75)]`
/// on a `#[vit(...)]` declaration: the FiPS-compressed ViT, whose MLPs are one basis per group and
/// sparse per-layer factors at the rank the budget allows (`RANK`, `PARAMS` count each basis
/// once and the factors' non-zeros).
#[proc_macro_attribute]
pub fn fips(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::fips(args.into(), item.into()).into()
}
