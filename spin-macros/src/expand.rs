//! Writing the expansion. It only names spin-core items: the config trait impl that fixes the
//! shapes, inherent consts (`PARAMS`, `MACS`, `SCHEDULE`, …, evaluated by spin-core's `const fn`s),
//! the builder impl, and the description.
use crate::ast::{self, FamilyKind, FipsArgs, PatternArg, SharedArgs};
use crate::valid::{self, Model};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{Attribute, ItemStruct};

fn attr_is(a: &Attribute, name: &str) -> bool {
    a.path().is_ident(name) || a.path().segments.last().is_some_and(|s| s.ident == name)
}

/// The arguments of an attribute written on the item, e.g. the `#[shared_blocks(...)]` under a
/// `#[convmixer(...)]`.
fn attr_args(a: &Attribute) -> syn::Result<TokenStream> {
    match &a.meta {
        syn::Meta::List(l) => Ok(l.tokens.clone()),
        syn::Meta::Path(_) => Ok(TokenStream::new()),
        syn::Meta::NameValue(nv) => Err(syn::Error::new(nv.span(), "expected arguments in parentheses")),
    }
}

fn unit_struct(item: TokenStream, what: &str) -> syn::Result<ItemStruct> {
    let s: ItemStruct = syn::parse2(item)?;
    if !matches!(s.fields, syn::Fields::Unit) {
        return Err(syn::Error::new(
            s.fields.span(),
            format!(
                "declare a {what} model as a unit struct, e.g. `pub struct {};`",
                s.ident
            ),
        ));
    }
    if !s.generics.params.is_empty() {
        return Err(syn::Error::new(
            s.generics.span(),
            "a model declaration takes no generic parameters",
        ));
    }
    Ok(s)
}

/// `#[convmixer(...)]` / `#[vit(...)]`, with an optional `#[shared_blocks(...)]` or `#[fips(...)]`
/// among the item's attributes.
pub fn family(kind: FamilyKind, args: TokenStream, item: TokenStream) -> TokenStream {
    family_inner(kind, args, item, None, None).unwrap_or_else(syn::Error::into_compile_error)
}

fn family_inner(
    kind: FamilyKind,
    args: TokenStream,
    item: TokenStream,
    shared_outer: Option<SharedArgs>,
    fips_outer: Option<FipsArgs>,
) -> syn::Result<TokenStream> {
    let fam = ast::parse_family(kind, args)?;
    let mut s = unit_struct(item, kind.attr())?;
    let (mut shared, mut fips) = (shared_outer, fips_outer);
    let mut kept = Vec::new();
    for a in s.attrs.drain(..) {
        if attr_is(&a, "shared_blocks") {
            if shared.is_some() {
                return Err(syn::Error::new(a.span(), "#[shared_blocks] is given twice"));
            }
            shared = Some(ast::parse_shared(attr_args(&a)?, a.span())?);
        } else if attr_is(&a, "fips") {
            if fips.is_some() {
                return Err(syn::Error::new(a.span(), "#[fips] is given twice"));
            }
            fips = Some(ast::parse_fips(attr_args(&a)?, a.span())?);
        } else {
            kept.push(a);
        }
    }
    s.attrs = kept;
    let model = valid::model(&fam, shared.as_ref(), &s.ident)?;
    let fips = fips.map(|f| valid::fips(&f, &model)).transpose()?;
    Ok(model_tokens(&s, &model, fips.as_ref()))
}

/// The family attribute among an item's attributes, removed, with its kind.
fn take_family(s: &mut ItemStruct) -> Option<(FamilyKind, Attribute)> {
    let pos = s
        .attrs
        .iter()
        .position(|a| attr_is(a, "convmixer") || attr_is(a, "vit"))?;
    let fam = s.attrs.remove(pos);
    let kind = if attr_is(&fam, "convmixer") {
        FamilyKind::ConvMixer
    } else {
        FamilyKind::Vit
    };
    Some((kind, fam))
}

/// `#[fips(...)]` written above the family attribute: hands over to it.
pub fn fips(args: TokenStream, item: TokenStream) -> TokenStream {
    (|| {
        let f = ast::parse_fips(args, Span::call_site())?;
        let mut s: ItemStruct = syn::parse2(item)?;
        let Some((kind, fam)) = take_family(&mut s) else {
            return Err(syn::Error::new(
                s.ident.span(),
                "#[fips(...)] compresses a declared ViT: add #[vit(...)] to this struct",
            ));
        };
        family_inner(kind, attr_args(&fam)?, quote!(#s), None, Some(f))
    })()
    .unwrap_or_else(syn::Error::into_compile_error)
}

/// `#[shared_blocks(...)]`: on a family declaration it hands over to the family macro; alone it
/// declares a trunk over the user's block type.
pub fn shared_blocks(args: TokenStream, item: TokenStream) -> TokenStream {
    shared_inner(args, item).unwrap_or_else(syn::Error::into_compile_error)
}

fn shared_inner(args: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    let shared = ast::parse_shared(args, Span::call_site())?;
    let mut s: ItemStruct = syn::parse2(item.clone())?;
    if let Some((kind, fam)) = take_family(&mut s) {
        return family_inner(kind, attr_args(&fam)?, quote!(#s), Some(shared), None);
    }
    // A trunk: `struct Trunk(Block);`
    let block = match &s.fields {
        syn::Fields::Unnamed(f) if f.unnamed.len() == 1 => f.unnamed[0].ty.clone(),
        other => {
            return Err(syn::Error::new(
                other.span(),
                "a stand-alone #[shared_blocks] declares a trunk over one block type: `pub struct Trunk(MyBlock);` \
                 (or add #[convmixer(...)] / #[vit(...)] to declare a whole model)",
            ))
        }
    };
    let (depth, groups, pattern) = valid::trunk(&shared)?;
    let ident = &s.ident;
    let vis = &s.vis;
    let attrs = &s.attrs;
    let schedule = schedule_tokens(depth, groups, &pattern);
    let pattern_name = pattern.name();
    Ok(quote! {
        #(#attrs)*
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #ident;

        impl ::spin_core::sharing::StackConfig for #ident {
            type Block = #block;
            const DEPTH: usize = #depth;
            const GROUPS: usize = #groups;
            const PATTERN: &'static str = #pattern_name;
            const SCHEDULE: &'static [usize] = &#ident::SCHEDULE;
        }

        impl #ident {
            pub const DEPTH: usize = #depth;
            pub const GROUPS: usize = #groups;
            pub const SCHEDULE: [usize; #depth] = #schedule;
        }

        impl<E: ::spin_core::dfdx::shapes::Dtype, D: ::spin_core::dfdx::tensor_ops::Device<E>>
            ::spin_core::dfdx::nn::BuildOnDevice<D, E> for #ident
        where
            #block: ::spin_core::dfdx::nn::BuildOnDevice<D, E>,
        {
            type Built = ::spin_core::sharing::SharedStack<
                #ident,
                <#block as ::spin_core::dfdx::nn::BuildOnDevice<D, E>>::Built,
            >;
        }
    })
}

fn schedule_tokens(depth: usize, groups: usize, pattern: &PatternArg) -> TokenStream {
    let builtin = match pattern {
        PatternArg::List(list) => return quote!([#(#list),*]),
        PatternArg::Sequential => quote!(Sequential),
        PatternArg::Strided => quote!(Strided),
        PatternArg::CycleRev => quote!(CycleRev),
        PatternArg::Random(seed) => quote!(Random(#seed)),
    };
    quote!(::spin_core::schedule::make::<#depth>(#groups, ::spin_core::schedule::Builtin::#builtin))
}

fn model_tokens(s: &ItemStruct, m: &Model, fips: Option<&valid::Fips>) -> TokenStream {
    let ident = &s.ident;
    let vis = &s.vis;
    let attrs = &s.attrs;
    let sh = &m.sharing;
    let (depth, groups) = (sh.depth, sh.groups);
    let schedule = schedule_tokens(depth, groups, &sh.pattern);
    let pattern_name = sh.pattern.name();
    let name = &m.name;
    let (dim, patch, image, grid, classes) = (m.dim, m.patch, m.image, m.grid, m.classes);
    let share = format_ident!("{}", sh.share);
    let c = quote!(::spin_core::dfdx::shapes::Const);
    let common = quote! {
        #(#attrs)*
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #ident;
    };
    let describe = match (m.kind, fips) {
        (FamilyKind::ConvMixer, _) => quote! {
            fn info() -> ::spin_core::ModelInfo {
                ::spin_core::convmixer::info::<#ident>()
            }
        },
        (FamilyKind::Vit, None) => quote! {
            fn info() -> ::spin_core::ModelInfo {
                ::spin_core::vit::info::<#ident>()
            }
            fn fips() -> ::core::option::Option<::spin_core::fips::FipsRunner> {
                ::core::option::Option::Some(::spin_core::fips::run::<#ident>)
            }
        },
        (FamilyKind::Vit, Some(_)) => quote! {
            fn info() -> ::spin_core::ModelInfo {
                ::spin_core::fips::model::info::<#ident>()
            }
        },
    };
    let common = quote! {
        #common
        impl ::spin_core::Describe for #ident {
            #describe
        }
    };
    match m.kind {
        FamilyKind::ConvMixer => {
            let kernel = m.kernel;
            let act = format_ident!("{}", m.act);
            let variant = format_ident!("{}", m.variant);
            let share = quote!(::spin_core::sharing::ConvMixerShare::#share);
            quote! {
                #common

                impl ::spin_core::convmixer::ConvMixerConfig for #ident {
                    type Dim = #c<#dim>;
                    type Kernel = #c<#kernel>;
                    type Patch = #c<#patch>;
                    type Image = #c<#image>;
                    type Grid = #c<#grid>;
                    type Classes = #c<#classes>;
                    const NAME: &'static str = #name;
                    const DEPTH: usize = #depth;
                    const GROUPS: usize = #groups;
                    const PATTERN: &'static str = #pattern_name;
                    const SCHEDULE: &'static [usize] = &#ident::SCHEDULE;
                    const SHARE: ::spin_core::sharing::ConvMixerShare = #share;
                    const ACT: ::spin_core::layers::Act = ::spin_core::layers::Act::#act;
                    const VARIANT: ::spin_core::convmixer::Variant = ::spin_core::convmixer::Variant::#variant;
                }

                impl #ident {
                    pub const NAME: &'static str = #name;
                    pub const DEPTH: usize = #depth;
                    pub const GROUPS: usize = #groups;
                    pub const SCHEDULE: [usize; #depth] = #schedule;
                    pub const PARAMS: usize =
                        ::spin_core::convmixer::params(#dim, #kernel, #patch, #classes, #depth, #groups, #share);
                    pub const MACS: u64 = ::spin_core::convmixer::macs(#dim, #kernel, #patch, #image, #classes, #depth);
                }

                impl<E: ::spin_core::SpinDtype, D: ::spin_core::SpinDevice<E>>
                    ::spin_core::dfdx::nn::BuildOnDevice<D, E> for #ident
                {
                    type Built = ::spin_core::convmixer::ConvMixer<#ident, E, D>;
                }
            }
        }
        FamilyKind::Vit => {
            let (heads, hidden) = (m.heads, m.hidden);
            let tokens = grid * grid + 1;
            let qkv = 3 * dim;
            let share = quote!(::spin_core::sharing::VitShare::#share);
            let vit_params = quote!(::spin_core::vit::params(#dim, #patch, #image, #hidden, #classes, #depth, #groups, #share));
            let (fips_const, fips_items, params, built) = match fips {
                None => (
                    quote!(),
                    quote!(),
                    vit_params,
                    quote!(::spin_core::vit::Vit<#ident, E, D>),
                ),
                Some(f) => {
                    let (budget, sparsity) = (f.budget, f.sparsity);
                    let n = f.groups.first().map_or(1, Vec::len);
                    let groups = f.groups.iter().map(|g| quote!(&[#(#g),*]));
                    (
                        quote!(const FIPS: ::core::option::Option<::spin_core::fips::FipsDecl> =
                            ::core::option::Option::Some(#ident::FIPS);),
                        quote! {
                            /// Rank of every group's basis, from the budget and sparsity.
                            pub const RANK: usize = ::spin_core::fips::rank(#dim, #n, #budget, #sparsity);
                            pub const FIPS: ::spin_core::fips::FipsDecl = ::spin_core::fips::FipsDecl {
                                groups: &[#(#groups),*],
                                budget: #budget,
                                sparsity: #sparsity,
                                rank: #ident::RANK,
                            };
                        },
                        quote!(::spin_core::fips::model::params(#vit_params, #dim, #hidden, #depth, &#ident::FIPS)),
                        quote!(::spin_core::vit::Vit<#ident, E, D, ::spin_core::fips::FipsMlps<#ident, E, D>>),
                    )
                }
            };
            quote! {
                #common

                impl ::spin_core::vit::VitConfig for #ident {
                    type Dim = #c<#dim>;
                    type Patch = #c<#patch>;
                    type Image = #c<#image>;
                    type Grid = #c<#grid>;
                    type Tokens = #c<#tokens>;
                    type Qkv = #c<#qkv>;
                    type Hidden = #c<#hidden>;
                    type Classes = #c<#classes>;
                    const NAME: &'static str = #name;
                    const HEADS: usize = #heads;
                    const DEPTH: usize = #depth;
                    const GROUPS: usize = #groups;
                    const PATTERN: &'static str = #pattern_name;
                    const SCHEDULE: &'static [usize] = &#ident::SCHEDULE;
                    const SHARE: ::spin_core::sharing::VitShare = #share;
                    #fips_const
                }

                impl #ident {
                    pub const NAME: &'static str = #name;
                    pub const DEPTH: usize = #depth;
                    pub const GROUPS: usize = #groups;
                    pub const SCHEDULE: [usize; #depth] = #schedule;
                    pub const PARAMS: usize = #params;
                    pub const MACS: u64 = ::spin_core::vit::macs(#dim, #patch, #image, #hidden, #classes, #depth);
                    #fips_items
                }

                impl<E: ::spin_core::SpinDtype, D: ::spin_core::SpinDevice<E>>
                    ::spin_core::dfdx::nn::BuildOnDevice<D, E> for #ident
                {
                    type Built = #built;
                }
            }
        }
    }
}
