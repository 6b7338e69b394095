//! The tensor ops loss plugins build their losses from, one implementation for both the
//! WebAssembly `tensor` resource and the native ABI's callbacks (codes in
//! `ftx_plugin_api::native::op`), so a loss computes the same either way.

use ftx_plugin_api::native::op;
use tch::{Kind, Tensor};

/// Operands of one op, resolved from handles.
pub struct Operands<'a> {
    pub a: Option<&'a Tensor>,
    pub b: Option<&'a Tensor>,
    pub c: Option<&'a Tensor>,
    pub x: Option<f64>,
    pub y: Option<f64>,
    pub dims: &'a [i32],
    pub keepdim: bool,
}

impl<'a> Operands<'a> {
    /// Tensor operands only.
    pub fn tensors(a: &'a Tensor, b: Option<&'a Tensor>, c: Option<&'a Tensor>) -> Self {
        Operands { a: Some(a), b, c, x: None, y: None, dims: &[], keepdim: false }
    }
}

/// Runs op `code` on a new tensor (on `device` for constructors).
pub fn apply(code: u32, o: &Operands, device: tch::Device) -> Result<Tensor, String> {
    let a = || o.a.ok_or_else(|| "missing operand".to_owned());
    let b = || o.b.ok_or_else(|| "missing second operand".to_owned());
    let x = || o.x.ok_or_else(|| "missing scalar".to_owned());
    let e = |r: Result<Tensor, tch::TchError>| r.map_err(|e| e.to_string());
    match code {
        op::NEW => e(Tensor::from(x()? as f32).f_to_device(device)),
        op::DETACH => e(a()?.f_detach()),
        op::ADD => e(a()?.f_add(b()?)),
        op::SUB => e(a()?.f_sub(b()?)),
        op::MUL => e(a()?.f_mul(b()?)),
        op::DIV => e(a()?.f_div(b()?)),
        op::MINIMUM => e(a()?.f_minimum(b()?)),
        op::MAXIMUM => e(a()?.f_maximum(b()?)),
        op::GREATER => {
            let t = a()?;
            e(t.f_gt_tensor(b()?).and_then(|m| m.f_to_kind(t.kind())))
        }
        op::SELECT => {
            let (t, cond) = (a()?, b()?);
            let other = o.c.ok_or_else(|| "missing third operand".to_owned())?;
            e(cond.f_ne(0.0).and_then(|mask| t.f_where_self(&mask, other)))
        }
        // The fallible forms throughout: a bad operand is an error for the plugin, never a panic.
        op::ADD_SCALAR => e(a()?.f_add_scalar(x()?)),
        op::MUL_SCALAR => e(a()?.f_mul_scalar(x()?)),
        op::POW_SCALAR => e(a()?.f_pow_tensor_scalar(x()?)),
        op::CLAMP => e(match (o.x, o.y) {
            (Some(lo), Some(hi)) => a()?.f_clamp(lo, hi),
            (Some(lo), None) => a()?.f_clamp_min(lo),
            (None, Some(hi)) => a()?.f_clamp_max(hi),
            (None, None) => Ok(a()?.shallow_clone()),
        }),
        op::NEG => e(a()?.f_neg()),
        op::ABS => e(a()?.f_abs()),
        op::EXP => e(a()?.f_exp()),
        op::LOG => e(a()?.f_log()),
        op::SIGMOID => e(a()?.f_sigmoid()),
        op::LOG_SIGMOID => e(a()?.f_log_sigmoid()),
        // log(1 + e^x), computed stably as -log_sigmoid(-x).
        op::SOFTPLUS => e(a()?.f_neg().and_then(|n| n.f_log_sigmoid()).and_then(|l| l.f_neg())),
        op::SUM | op::MEAN => {
            let t = a()?;
            let dims: Vec<i64> = o.dims.iter().map(|&d| i64::from(d)).collect();
            e(match (dims.is_empty(), code == op::MEAN) {
                (true, true) => t.f_mean(Kind::Float),
                (true, false) => t.f_sum(Kind::Float),
                (false, true) => t.f_mean_dim(dims.as_slice(), o.keepdim, Kind::Float),
                (false, false) => t.f_sum_dim_intlist(dims.as_slice(), o.keepdim, Kind::Float),
            })
        }
        other => Err(format!("unknown tensor op {other}")),
    }
}

/// Largest tensor `values` reads back.
pub const MAX_VALUES: i64 = 65_536;

/// The values of a small tensor, for metrics.
pub fn values(t: &Tensor) -> Result<Vec<f32>, String> {
    if t.numel() as i64 > MAX_VALUES {
        return Err(format!("values() reads at most {MAX_VALUES} elements; reduce the tensor first"));
    }
    let flat = t.detach().to_kind(Kind::Float).to_device(tch::Device::Cpu).flatten(0, -1);
    Vec::<f32>::try_from(&flat).map_err(|e| e.to_string())
}
