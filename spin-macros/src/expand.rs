//! Writing the expansion. It only names items of spin-core's `__private` facade: the config trait
//! impl that fixes the shapes, inherent consts (`PARAMS`, `MACS`, `SCHEDULE`, …, evaluated by
//! spin-rules' `const fn`s), the builder impl, and the description.
use crate::ast::{self, FamilyKind, FipsArgs, SharedArgs};
use crate::valid::{self, Model, Share};
use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use spin_rules::Pattern;
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

        impl ::spin_core::__private::StackConfig for #ident {
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

        impl<E: ::spin_core::__private::dfdx::shapes::Dtype, D: ::spin_core::__private::dfdx::tensor_ops::Device<E>>
            ::spin_core::__private::dfdx::nn::BuildOnDevice<D, E> for #ident
        where
            #block: ::spin_core::__private::dfdx::nn::BuildOnDevice<D, E>,
        {
            type Built = ::spin_core::__private::SharedStack<
                #ident,
                <#block as ::spin_core::__private::dfdx::nn::BuildOnDevice<D, E>>::Built,
            >;
        }
    })
}

/// The schedule as an array expression: a list as written, a built-in pattern through the same
/// `const fn` that builds schedules at run time.
fn schedule_tokens(depth: usize, groups: usize, pattern: &Pattern) -> TokenStream {
    let p = quote!(::spin_core::__private::Pattern);
    let pattern = match pattern {
        Pattern::List(list) => return quote!([#(#list),*]),
        Pattern::Sequential => quote!(#p::Sequential),
        Pattern::Strided => quote!(#p::Strided),
        Pattern::CycleRev => quote!(#p::CycleRev),
        Pattern::Random { seed } => quote!(#p::Random { seed: #seed }),
    };
    quote!(::spin_core::__private::make_schedule::<#depth>(#groups, &#pattern))
}

/// A rules enum value as a path into the facade, e.g. `ConvMixerShare::Pointwise`.
fn enum_tokens(ty: &str, value: &impl std::fmt::Debug) -> TokenStream {
    let (ty, variant) = (format_ident!("{ty}"), format_ident!("{value:?}"));
    quote!(::spin_core::__private::#ty::#variant)
}

/// The config's `EVAL` const when the declaration overrides timm's eval transform (the trait's
/// default, timm's, otherwise).
fn eval_tokens(e: &valid::Eval) -> TokenStream {
    if e.crop_pct.is_none() && e.crop_mode.is_none() && e.interpolation.is_none() {
        return quote!();
    }
    let pv = quote!(::spin_core::__private);
    let opt = |t: Option<TokenStream>| match t {
        Some(t) => quote!(::core::option::Option::Some(#t)),
        None => quote!(::core::option::Option::None),
    };
    let crop_pct = opt(e.crop_pct.map(|c| {
        let c = c as f32;
        quote!(#c)
    }));
    let crop_mode = opt(e.crop_mode.map(|m| enum_tokens("CropMode", &m)));
    let interpolation = opt(e.interpolation.map(|i| enum_tokens("Interpolation", &i)));
    quote! {
        const EVAL: #pv::EvalOverride = #pv::EvalOverride {
            crop_pct: #crop_pct,
            crop_mode: #crop_mode,
            interpolation: #interpolation,
        };
    }
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
    let share = match sh.share {
        Share::ConvMixer(s) => enum_tokens("ConvMixerShare", &s),
        Share::Vit(s) => enum_tokens("VitShare", &s),
    };
    let c = quote!(::spin_core::__private::dfdx::shapes::Const);
    let pv = quote!(::spin_core::__private);
    let eval = eval_tokens(&m.eval);
    let common = quote! {
        #(#attrs)*
        #[derive(Clone, Copy, Debug, Default)]
        #vis struct #ident;
    };
    let (info, runner) = match (m.kind, fips) {
        (FamilyKind::ConvMixer, _) => (quote!(#pv::convmixer_info::<#ident>()), None),
        (FamilyKind::Vit, None) => (
            quote!(#pv::vit_info::<#ident>()),
            Some(quote!(#pv::fips_run::<#ident>)),
        ),
        (FamilyKind::Vit, Some(_)) => (quote!(#pv::fips_info::<#ident>()), None),
    };
    let loader = (m.kind == FamilyKind::Vit).then(|| quote!(#pv::fips_load::<#ident>));
    let some = |t: Option<TokenStream>| match t {
        Some(t) => quote!(::core::option::Option::Some(#t)),
        None => quote!(::core::option::Option::None),
    };
    let (runner, loader) = (some(runner), some(loader));
    let common = quote! {
        #common
        impl #pv::Describe for #ident {
            fn info() -> #pv::ModelInfo {
                #info
            }
        }
        impl #pv::FipsCompress for #ident {
            const RUNNER: ::core::option::Option<#pv::FipsRunner> = #runner;
            const LOADER: ::core::option::Option<#pv::FipsLoader> = #loader;
        }
    };
    match m.kind {
        FamilyKind::ConvMixer => {
            let kernel = m.kernel;
            let act = enum_tokens("Act", &m.act);
            let variant = enum_tokens("Variant", &m.variant);
            quote! {
                #common

                impl #pv::ConvMixerConfig for #ident {
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
                    const SHARE: #pv::ConvMixerShare = #share;
                    const ACT: #pv::Act = #act;
                    const VARIANT: #pv::Variant = #variant;
                    #eval
                }

                impl #ident {
                    pub const NAME: &'static str = #name;
                    pub const DEPTH: usize = #depth;
                    pub const GROUPS: usize = #groups;
                    pub const SCHEDULE: [usize; #depth] = #schedule;
                    pub const PARAMS: usize =
                        #pv::counts::convmixer_params(#dim, #kernel, #patch, #classes, #depth, #groups, #share);
                    pub const MACS: u64 = #pv::counts::convmixer_macs(#dim, #kernel, #patch, #image, #classes, #depth);
                }

                impl<E: #pv::SpinDtype, D: #pv::SpinDevice<E>>
                    #pv::dfdx::nn::BuildOnDevice<D, E> for #ident
                {
                    type Built = #pv::ConvMixer<#ident, E, D>;
                }
            }
        }
        FamilyKind::Vit => {
            let (heads, hidden) = (m.heads, m.hidden);
            let tokens = grid * grid + 1;
            let qkv = 3 * dim;
            let vit_params = quote!(#pv::counts::vit_params(#dim, #patch, #image, #hidden, #classes, #depth, #groups, #share));
            let (fips_const, fips_items, params, built) = match fips {
                None => (quote!(), quote!(), vit_params, quote!(#pv::Vit<#ident, E, D>)),
                Some(f) => {
                    let (budget, sparsity) = (f.budget, f.sparsity);
                    let n = f.groups.first().map_or(1, Vec::len);
                    let n_groups = f.groups.len();
                    let groups = f.groups.iter().map(|g| quote!(&[#(#g),*]));
                    (
                        quote!(const FIPS: ::core::option::Option<#pv::FipsDecl> =
                            ::core::option::Option::Some(#ident::FIPS);),
                        quote! {
                            /// Rank of every group's basis, from the budget and sparsity.
                            pub const RANK: usize = #pv::fips_rules::rank(#dim, #n, #budget, #sparsity);
                            pub const FIPS: #pv::FipsDecl = #pv::FipsDecl {
                                groups: &[#(#groups),*],
                                budget: #budget,
                                sparsity: #sparsity,
                                rank: #ident::RANK,
                            };
                        },
                        quote!(#pv::fips_rules::model_params(#vit_params, #dim, #hidden, #depth, #n_groups, #ident::RANK, #sparsity)),
                        quote!(#pv::Vit<#ident, E, D, #pv::FipsMlps<#ident, E, D>>),
                    )
                }
            };
            quote! {
                #common

                impl #pv::VitConfig for #ident {
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
                    const SHARE: #pv::VitShare = #share;
                    #fips_const
                    #eval
                }

                impl #ident {
                    pub const NAME: &'static str = #name;
                    pub const DEPTH: usize = #depth;
                    pub const GROUPS: usize = #groups;
                    pub const SCHEDULE: [usize; #depth] = #schedule;
                    pub const PARAMS: usize = #params;
                    pub const MACS: u64 = #pv::counts::vit_macs(#dim, #patch, #image, #hidden, #classes, #depth);
                    #fips_items
                }

                impl<E: #pv::SpinDtype, D: #pv::SpinDevice<E>>
                    #pv::dfdx::nn::BuildOnDevice<D, E> for #ident
                {
                    type Built = #built;
                }
            }
        }
    }
}
