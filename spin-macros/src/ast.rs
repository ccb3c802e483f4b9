//! Parsing attribute arguments into typed configs, keeping each argument's span for errors.
use proc_macro2::{Span, TokenStream};
use spin_rules::Pattern;
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Ident, Lit, LitInt, LitStr, Token};

/// A parsed argument value and where it was written.
#[derive(Clone, Debug)]
pub struct Arg<T> {
    pub value: T,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyKind {
    ConvMixer,
    Vit,
}

impl FamilyKind {
    pub fn attr(self) -> &'static str {
        match self {
            FamilyKind::ConvMixer => "convmixer",
            FamilyKind::Vit => "vit",
        }
    }
    fn valid_args(self) -> &'static str {
        match self {
            FamilyKind::ConvMixer => {
                "dim, kernel, patch, image, classes, act, variant, depth, name, crop_pct, crop_mode, interpolation"
            }
            FamilyKind::Vit => {
                "dim, heads, patch, image, classes, mlp_ratio, depth, name, crop_pct, crop_mode, interpolation"
            }
        }
    }
}

/// `#[convmixer(...)]` or `#[vit(...)]`.
#[derive(Clone, Debug)]
pub struct FamilyArgs {
    pub kind: FamilyKind,
    pub dim: Option<Arg<usize>>,
    pub kernel: Option<Arg<usize>>,
    pub patch: Option<Arg<usize>>,
    pub image: Option<Arg<usize>>,
    pub classes: Option<Arg<usize>>,
    pub heads: Option<Arg<usize>>,
    pub mlp_ratio: Option<Arg<f64>>,
    pub act: Option<Arg<String>>,
    pub variant: Option<Arg<String>>,
    pub depth: Option<Arg<usize>>,
    pub name: Option<Arg<String>>,
    /// The eval transform's overrides of timm's defaults for the family.
    pub crop_pct: Option<Arg<f64>>,
    pub crop_mode: Option<Arg<String>>,
    pub interpolation: Option<Arg<String>>,
}

/// `#[shared_blocks(...)]`.
#[derive(Clone, Debug)]
pub struct SharedArgs {
    pub span: Span,
    pub depth: Option<Arg<usize>>,
    pub groups: Option<Arg<usize>>,
    pub pattern: Option<Arg<Pattern>>,
    pub share: Option<Arg<String>>,
}

/// `#[fips(groups = [[0, 1], [2, 3]], budget = 0.5, sparsity = 0.75)]`.
#[derive(Clone, Debug)]
pub struct FipsArgs {
    pub span: Span,
    pub groups: Option<Arg<Vec<Vec<usize>>>>,
    pub budget: Option<Arg<f64>>,
    pub sparsity: Option<Arg<f64>>,
}

fn set<T>(slot: &mut Option<Arg<T>>, meta: &ParseNestedMeta, value: Arg<T>) -> syn::Result<()> {
    if slot.is_some() {
        return Err(meta.error("this argument is given twice"));
    }
    *slot = Some(value);
    Ok(())
}

fn int(meta: &ParseNestedMeta) -> syn::Result<Arg<usize>> {
    let lit: LitInt = meta.value()?.parse()?;
    Ok(Arg {
        value: lit.base10_parse()?,
        span: lit.span(),
    })
}

fn ident(meta: &ParseNestedMeta) -> syn::Result<Arg<String>> {
    let id: Ident = meta.value()?.parse()?;
    Ok(Arg {
        value: id.to_string(),
        span: id.span(),
    })
}

fn number(meta: &ParseNestedMeta, name: &str) -> syn::Result<Arg<f64>> {
    let lit: Lit = meta.value()?.parse()?;
    let value = match &lit {
        Lit::Int(i) => i.base10_parse::<u64>()? as f64,
        Lit::Float(f) => f.base10_parse::<f64>()?,
        _ => {
            return Err(syn::Error::new(
                lit.span(),
                format!("{name} takes a number, e.g. `{name} = 0.5`"),
            ))
        }
    };
    Ok(Arg {
        value,
        span: lit.span(),
    })
}

fn key(meta: &ParseNestedMeta) -> String {
    meta.path.get_ident().map(|i| i.to_string()).unwrap_or_default()
}

pub fn parse_family(kind: FamilyKind, args: TokenStream) -> syn::Result<FamilyArgs> {
    let mut a = FamilyArgs {
        kind,
        dim: None,
        kernel: None,
        patch: None,
        image: None,
        classes: None,
        heads: None,
        mlp_ratio: None,
        act: None,
        variant: None,
        depth: None,
        name: None,
        crop_pct: None,
        crop_mode: None,
        interpolation: None,
    };
    let parser = syn::meta::parser(|meta| {
        use FamilyKind::*;
        match (kind, key(&meta).as_str()) {
            (_, "dim") => set(&mut a.dim, &meta, int(&meta)?),
            (_, "patch") => set(&mut a.patch, &meta, int(&meta)?),
            (_, "image") => set(&mut a.image, &meta, int(&meta)?),
            (_, "classes") => set(&mut a.classes, &meta, int(&meta)?),
            (_, "depth") => set(&mut a.depth, &meta, int(&meta)?),
            (_, "name") => {
                let s: LitStr = meta.value()?.parse()?;
                set(
                    &mut a.name,
                    &meta,
                    Arg {
                        value: s.value(),
                        span: s.span(),
                    },
                )
            }
            (_, "crop_pct") => set(&mut a.crop_pct, &meta, number(&meta, "crop_pct")?),
            (_, "crop_mode") => set(&mut a.crop_mode, &meta, ident(&meta)?),
            (_, "interpolation") => set(&mut a.interpolation, &meta, ident(&meta)?),
            (ConvMixer, "kernel") => set(&mut a.kernel, &meta, int(&meta)?),
            (ConvMixer, "act") => set(&mut a.act, &meta, ident(&meta)?),
            (ConvMixer, "variant") => set(&mut a.variant, &meta, ident(&meta)?),
            (Vit, "heads") => set(&mut a.heads, &meta, int(&meta)?),
            (Vit, "mlp_ratio") => set(&mut a.mlp_ratio, &meta, number(&meta, "mlp_ratio")?),
            (_, other) => Err(meta.error(format!(
                "unknown argument `{other}` for #[{}]; valid arguments are: {}",
                kind.attr(),
                kind.valid_args()
            ))),
        }
    });
    parser.parse2(args)?;
    Ok(a)
}

pub fn parse_shared(args: TokenStream, span: Span) -> syn::Result<SharedArgs> {
    let mut a = SharedArgs {
        span,
        depth: None,
        groups: None,
        pattern: None,
        share: None,
    };
    let parser = syn::meta::parser(|meta| {
        match key(&meta).as_str() {
        "depth" => set(&mut a.depth, &meta, int(&meta)?),
        "groups" => set(&mut a.groups, &meta, int(&meta)?),
        "share" => set(&mut a.share, &meta, ident(&meta)?),
        "pattern" => {
            let input = meta.value()?;
            let pattern = if input.peek(syn::token::Bracket) {
                let content;
                let bracket = syn::bracketed!(content in input);
                let items = content.parse_terminated(|p| p.parse::<LitInt>(), Token![,])?;
                let list = items.iter().map(|l| l.base10_parse()).collect::<syn::Result<Vec<usize>>>()?;
                Arg { value: Pattern::List(list), span: bracket.span.join() }
            } else {
                let id: Ident = input.parse()?;
                let value = match id.to_string().as_str() {
                    "sequential" => Pattern::Sequential,
                    "strided" => Pattern::Strided,
                    "cycle_rev" => Pattern::CycleRev,
                    "random" => {
                        let content;
                        syn::parenthesized!(content in input);
                        let k: Ident = content.parse()?;
                        if k != "seed" {
                            return Err(syn::Error::new(k.span(), "expected `random(seed = N)`"));
                        }
                        content.parse::<Token![=]>()?;
                        let seed: LitInt = content.parse()?;
                        Pattern::Random { seed: seed.base10_parse()? }
                    }
                    other => {
                        return Err(syn::Error::new(
                            id.span(),
                            format!(
                                "unknown pattern `{other}`; valid patterns are: sequential, strided, \
                                 cycle_rev, random(seed = N), or a list such as [0, 1, 1, 0]"
                            ),
                        ))
                    }
                };
                Arg { value, span: id.span() }
            };
            set(&mut a.pattern, &meta, pattern)
        }
        other => Err(meta.error(format!(
            "unknown argument `{other}` for #[shared_blocks]; valid arguments are: depth, groups, pattern, share"
        ))),
    }
    });
    parser.parse2(args)?;
    Ok(a)
}

pub fn parse_fips(args: TokenStream, span: Span) -> syn::Result<FipsArgs> {
    let mut a = FipsArgs {
        span,
        groups: None,
        budget: None,
        sparsity: None,
    };
    let parser = syn::meta::parser(|meta| match key(&meta).as_str() {
        "budget" => set(&mut a.budget, &meta, number(&meta, "budget")?),
        "sparsity" => set(&mut a.sparsity, &meta, number(&meta, "sparsity")?),
        "groups" => {
            let input = meta.value()?;
            let content;
            let outer = syn::bracketed!(content in input);
            let groups = content.parse_terminated(
                |p| {
                    let inner;
                    syn::bracketed!(inner in p);
                    let items = inner.parse_terminated(|q| q.parse::<LitInt>(), Token![,])?;
                    items
                        .iter()
                        .map(|l| l.base10_parse())
                        .collect::<syn::Result<Vec<usize>>>()
                },
                Token![,],
            )?;
            let value = groups.into_iter().collect();
            set(
                &mut a.groups,
                &meta,
                Arg {
                    value,
                    span: outer.span.join(),
                },
            )
        }
        other => Err(meta.error(format!(
            "unknown argument `{other}` for #[fips]; valid arguments are: groups, budget, sparsity"
        ))),
    });
    parser.parse2(args)?;
    Ok(a)
}
