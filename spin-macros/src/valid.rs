//! Checking parsed arguments. Every error points at the argument at fault and says what would be
//! valid; all errors of a declaration are reported together. The rules themselves (schedules,
//! granularities, FiPS plans) are `spin-rules`'; this file only turns their errors into spanned
//! compile errors and checks what only a declaration has (missing arguments, sizes that must
//! divide).
use crate::ast::{Arg, FamilyArgs, FamilyKind, FipsArgs, SharedArgs};
use proc_macro2::Span;
use spin_rules::{
    crop_pct_error, parse_name, Act, ConvMixerShare, CropMode, Field, Interpolation, Pattern, RuleError,
    Variant, VitShare,
};

/// A checked model declaration: every number the expansion needs.
#[derive(Clone, Debug)]
pub struct Model {
    pub kind: FamilyKind,
    pub name: String,
    pub dim: usize,
    pub patch: usize,
    pub image: usize,
    pub grid: usize,
    pub classes: usize,
    pub kernel: usize,
    pub act: Act,
    pub variant: Variant,
    pub heads: usize,
    pub hidden: usize,
    pub sharing: Sharing,
    pub eval: Eval,
}

/// The eval transform's overrides written in the declaration (None: timm's default).
#[derive(Clone, Debug, Default)]
pub struct Eval {
    pub crop_pct: Option<f64>,
    pub crop_mode: Option<CropMode>,
    pub interpolation: Option<Interpolation>,
}

/// What a model shares, per family.
#[derive(Clone, Copy, Debug)]
pub enum Share {
    ConvMixer(ConvMixerShare),
    Vit(VitShare),
}

/// A checked sharing configuration.
#[derive(Clone, Debug)]
pub struct Sharing {
    pub depth: usize,
    pub groups: usize,
    pub pattern: Pattern,
    pub share: Share,
}

#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    fn push(&mut self, span: Span, msg: impl std::fmt::Display) {
        let e = syn::Error::new(span, msg);
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }
    fn finish<T>(self, value: impl FnOnce() -> T) -> syn::Result<T> {
        match self.0 {
            Some(e) => Err(e),
            None => Ok(value()),
        }
    }
}

fn required(errs: &mut Errors, arg: &Option<Arg<usize>>, name: &str, attr: &str, example: &str) -> usize {
    match arg {
        Some(a) if a.value == 0 => {
            errs.push(a.span, format!("`{name}` must be at least 1"));
            1
        }
        Some(a) => a.value,
        None => {
            errs.push(
                Span::call_site(),
                format!("missing argument `{name}` in #[{attr}(...)], e.g. `{name} = {example}`"),
            );
            1
        }
    }
}

/// A named choice from one of spin-rules' tables; the table's first entry is the default.
fn choice<T: Copy>(errs: &mut Errors, arg: &Option<Arg<String>>, what: &str, table: &[(&str, T)]) -> T {
    let Some(a) = arg else { return table[0].1 };
    parse_name(table, what, &a.value).unwrap_or_else(|msg| {
        errs.push(a.span, msg);
        table[0].1
    })
}

pub fn model(f: &FamilyArgs, shared: Option<&SharedArgs>, ident: &syn::Ident) -> syn::Result<Model> {
    let mut errs = Errors::default();
    let attr = f.kind.attr();
    let dim = required(&mut errs, &f.dim, "dim", attr, "256");
    let patch = required(&mut errs, &f.patch, "patch", attr, "16");
    let image = required(&mut errs, &f.image, "image", attr, "224");
    let classes = required(&mut errs, &f.classes, "classes", attr, "1000");
    if let (Some(p), Some(i)) = (&f.patch, &f.image) {
        if p.value > 0 && i.value % p.value != 0 {
            let divisors: Vec<String> = (1..=i.value)
                .filter(|d| i.value % d == 0)
                .map(|d| d.to_string())
                .collect();
            errs.push(
                p.span,
                format!(
                    "image ({}) is not divisible by patch ({}): patches must tile the image; valid patch sizes: {}",
                    i.value,
                    p.value,
                    divisors.join(", ")
                ),
            );
        }
    }
    let (mut kernel, mut heads, mut hidden) = (0, 0, 0);
    let (mut act, mut variant) = (Act::default(), Variant::default());
    match f.kind {
        FamilyKind::ConvMixer => {
            kernel = required(&mut errs, &f.kernel, "kernel", attr, "9");
            if let Some(k) = &f.kernel {
                if k.value % 2 == 0 {
                    errs.push(
                        k.span,
                        format!(
                            "kernel must be odd for 'same' padding, got {}; use {} or {}",
                            k.value,
                            k.value - 1,
                            k.value + 1
                        ),
                    );
                }
            }
            act = choice(&mut errs, &f.act, "act", Act::NAMES);
            variant = choice(&mut errs, &f.variant, "variant", Variant::NAMES);
        }
        FamilyKind::Vit => {
            heads = required(&mut errs, &f.heads, "heads", attr, "6");
            if let (Some(h), Some(d)) = (&f.heads, &f.dim) {
                if h.value > 0 && d.value % h.value != 0 {
                    let valid: Vec<String> = (1..=d.value.min(64))
                        .filter(|x| d.value % x == 0)
                        .map(|x| x.to_string())
                        .collect();
                    errs.push(
                        h.span,
                        format!(
                            "dim ({}) is not divisible by heads ({}); valid head counts: {}",
                            d.value,
                            h.value,
                            valid.join(", ")
                        ),
                    );
                }
            }
            let ratio = f.mlp_ratio.as_ref().map(|r| r.value).unwrap_or(4.0);
            let h = dim as f64 * ratio;
            if h.fract() != 0.0 || h < 1.0 {
                let span = f
                    .mlp_ratio
                    .as_ref()
                    .map(|r| r.span)
                    .unwrap_or_else(Span::call_site);
                errs.push(
                    span,
                    format!("mlp_ratio × dim = {h} must be a positive whole number"),
                );
            }
            hidden = h as usize;
        }
    }
    let sharing = sharing(&mut errs, f, shared);
    let eval = eval(&mut errs, f);
    let name = f
        .name
        .as_ref()
        .map(|n| n.value.clone())
        .unwrap_or_else(|| ident.to_string());
    errs.finish(|| Model {
        kind: f.kind,
        name,
        dim,
        patch,
        image,
        grid: image / patch.max(1),
        classes,
        kernel,
        act,
        variant,
        heads,
        hidden,
        sharing: sharing.unwrap_or(Sharing {
            depth: 1,
            groups: 1,
            pattern: Pattern::Sequential,
            share: default_share(f.kind),
        }),
        eval,
    })
}

fn eval(errs: &mut Errors, f: &FamilyArgs) -> Eval {
    if let Some(c) = &f.crop_pct {
        if let Some(msg) = crop_pct_error(c.value) {
            errs.push(c.span, msg);
        }
    }
    Eval {
        crop_pct: f.crop_pct.as_ref().map(|c| c.value),
        crop_mode: f
            .crop_mode
            .is_some()
            .then(|| choice(errs, &f.crop_mode, "crop_mode", CropMode::NAMES)),
        interpolation: f
            .interpolation
            .is_some()
            .then(|| choice(errs, &f.interpolation, "interpolation", Interpolation::NAMES)),
    }
}

fn default_share(kind: FamilyKind) -> Share {
    match kind {
        FamilyKind::ConvMixer => Share::ConvMixer(ConvMixerShare::NAMES[0].1),
        FamilyKind::Vit => Share::Vit(VitShare::NAMES[0].1),
    }
}

fn sharing(errs: &mut Errors, f: &FamilyArgs, s: Option<&SharedArgs>) -> Option<Sharing> {
    let Some(s) = s else {
        let depth = required(errs, &f.depth, "depth", f.kind.attr(), "8");
        return Some(Sharing {
            depth,
            groups: depth,
            pattern: Pattern::Sequential,
            share: default_share(f.kind),
        });
    };
    if let (Some(_), Some(sd)) = (&f.depth, &s.depth) {
        errs.push(
            sd.span,
            "depth is given twice: keep it in #[shared_blocks] and remove it from the family attribute",
        );
    }
    let depth_arg = s.depth.clone().or_else(|| f.depth.clone());
    let share = match f.kind {
        FamilyKind::ConvMixer => {
            Share::ConvMixer(choice(errs, &s.share, "ConvMixer share", ConvMixerShare::NAMES))
        }
        FamilyKind::Vit => Share::Vit(choice(errs, &s.share, "ViT share", VitShare::NAMES)),
    };
    let (depth, groups, pattern) = schedule(errs, s, &depth_arg)?;
    Some(Sharing {
        depth,
        groups,
        pattern,
        share,
    })
}

/// Checks depth, groups and pattern of a `#[shared_blocks]` with spin-rules' schedule check.
pub fn schedule(
    errs: &mut Errors,
    s: &SharedArgs,
    depth: &Option<Arg<usize>>,
) -> Option<(usize, usize, Pattern)> {
    let depth_v = required_at(errs, depth, "depth", s.span)?;
    let groups = s.groups.as_ref();
    let groups_v = required_at(errs, &s.groups, "groups", s.span)?;
    let pattern = s
        .pattern
        .as_ref()
        .map(|p| p.value.clone())
        .unwrap_or(Pattern::Sequential);
    if let Err(RuleError { field, message }) = spin_rules::schedule::check(depth_v, groups_v, &pattern) {
        let span = match field {
            Field::Pattern => s.pattern.as_ref().map(|p| p.span),
            Field::Depth => depth.as_ref().map(|d| d.span),
            _ => None,
        };
        errs.push(span.or(groups.map(|g| g.span)).unwrap_or(s.span), message);
        return None;
    }
    Some((depth_v, groups_v, pattern))
}

fn required_at(errs: &mut Errors, arg: &Option<Arg<usize>>, name: &str, span: Span) -> Option<usize> {
    match arg {
        None => {
            errs.push(
                span,
                format!("missing argument `{name}` in #[shared_blocks(...)], e.g. `{name} = 4`"),
            );
            None
        }
        Some(a) if a.value == 0 => {
            errs.push(a.span, format!("`{name}` must be at least 1"));
            None
        }
        Some(a) => Some(a.value),
    }
}

/// Checks a stand-alone `#[shared_blocks]` over a user block.
pub fn trunk(s: &SharedArgs) -> syn::Result<(usize, usize, Pattern)> {
    let mut errs = Errors::default();
    if let Some(share) = &s.share {
        errs.push(
            share.span,
            "`share` applies to #[convmixer] and #[vit] models; a trunk of user blocks shares whole blocks",
        );
    }
    let out = schedule(&mut errs, s, &s.depth);
    errs.finish(|| out.unwrap())
}

/// A checked `#[fips(...)]`.
#[derive(Clone, Debug)]
pub struct Fips {
    pub groups: Vec<Vec<usize>>,
    pub budget: f64,
    pub sparsity: f64,
}

/// Checks a `#[fips(...)]` against the model it compresses: a ViT without SPIN sharing, and a
/// plan that spin-rules accepts (groups that cover every block once with one size, a budget in
/// (0, 1], a sparsity in [0, 1), a non-zero rank).
pub fn fips(a: &FipsArgs, m: &Model) -> syn::Result<Fips> {
    let mut errs = Errors::default();
    if m.kind != FamilyKind::Vit {
        errs.push(a.span, "#[fips] compresses a ViT's MLPs: use it with #[vit(...)]");
    }
    if m.sharing.groups != m.sharing.depth {
        errs.push(
            a.span,
            "#[fips] starts from a ViT whose blocks share nothing: remove #[shared_blocks] (FiPS shares its own bases)",
        );
    }
    let groups = match &a.groups {
        Some(g) => g.value.clone(),
        None => {
            errs.push(
                a.span,
                "missing argument `groups` in #[fips(...)], e.g. `groups = [[0, 1], [2, 3]]`",
            );
            vec![]
        }
    };
    let budget = match &a.budget {
        Some(b) => b.value,
        None => {
            errs.push(
                a.span,
                "missing argument `budget` in #[fips(...)], e.g. `budget = 0.5`",
            );
            0.5
        }
    };
    let sparsity = a.sparsity.as_ref().map_or(0.0, |s| s.value);
    if a.groups.is_some() {
        // The rank itself is evaluated in the expansion, by the same const fn.
        match spin_rules::fips::check_plan(m.sharing.depth, m.dim, &groups, budget, sparsity) {
            Ok(_) => {}
            Err(errors) => {
                for RuleError { field, message } in errors {
                    let span = match field {
                        Field::FipsGroups => a.groups.as_ref().map(|g| g.span),
                        Field::Budget => a.budget.as_ref().map(|b| b.span),
                        Field::Sparsity => a.sparsity.as_ref().map(|s| s.span),
                        _ => None,
                    };
                    errs.push(span.unwrap_or(a.span), message);
                }
            }
        }
    }
    errs.finish(|| Fips {
        groups,
        budget,
        sparsity,
    })
}
