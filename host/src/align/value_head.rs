//! PPO's critic: a value per token, from the policy's own final hidden states.

use crate::model::CausalLm;
use tch::{Device, Kind, Tensor};

/// PPO's value head: a linear layer on the final (normed) hidden state, in fp32.
pub struct ValueHead {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl ValueHead {
    /// Zero-initialised (every value starts at 0), trainable.
    pub fn new(hidden: i64, device: Device) -> ValueHead {
        ValueHead {
            weight: Tensor::zeros([1, hidden], (Kind::Float, device)).set_requires_grad(true),
            bias: Tensor::zeros([1], (Kind::Float, device)).set_requires_grad(true),
        }
    }

    /// Values `[B, T]` of hidden states `[B, T, hidden]`.
    pub fn forward(&self, model: &CausalLm, hidden: &Tensor) -> Tensor {
        model.norm.forward(hidden).to_kind(Kind::Float).linear(&self.weight, Some(&self.bias)).squeeze_dim(-1)
    }

    /// Its tensors under the names they are saved with (`value_head.safetensors`).
    pub fn named(&self) -> Vec<(String, Tensor)> {
        vec![("v_head.weight".into(), self.weight.shallow_clone()), ("v_head.bias".into(), self.bias.shallow_clone())]
    }
}
