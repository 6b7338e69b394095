//! What the training step keeps for backward, tensor by tensor and layer by layer: the
//! engine's own account, against which the planner's activation rules
//! (`plan::activation_bytes`) are held, on any device (the CPU included).
//!
//! [`SavedCount`] records every tensor an autograd node saves while it is open on the calling
//! thread (built-in ops and ftx's C++ nodes alike: src/train/saved_tensors.cpp, through
//! libtorch's saved-tensor hooks), by storage: a storage several nodes save counts once, a
//! view counts its whole storage (what it keeps alive), and tensors that existed before the
//! forward pass (weights, adapters, rotary tables, masks) are left out. [`saved_by_layer`] runs
//! a model's forward pass under one, tagged by layer.

use crate::data::Batch;
use crate::model::attention::{AttnInputs, AttnMask};
use crate::model::CausalLm;
use tch::{Kind, Tensor};

/// Why a count could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SavedCountError {
    /// Built without the C++ shim (a libtorch without headers).
    #[error("counting saved tensors needs ftx's C++ shim, which this build was made without (a libtorch without headers)")]
    NoShim,
    /// This thread already counts.
    #[error("a saved-tensor count is already open on this thread")]
    AlreadyOpen,
}

/// One storage the graph keeps for backward.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedTensor {
    /// The tag it was first saved under ([`saved_by_layer`]: the layer).
    pub tag: i64,
    /// Its storage's bytes (a view keeps all of them alive).
    pub bytes: u64,
    /// The shape of the tensor first saved on it.
    pub shape: Vec<i64>,
    /// Its element type.
    pub kind: Kind,
}

/// An open count on this thread (not `Send`: the hooks are the opening thread's).
pub struct SavedCount {
    #[cfg_attr(not(ftx_torch_shim), allow(dead_code))]
    handle: *mut std::ffi::c_void,
}

#[cfg(ftx_torch_shim)]
extern "C" {
    fn ftx_saved_count_open(exclude: *const *const std::ffi::c_void, n: i64) -> *mut std::ffi::c_void;
    fn ftx_saved_count_tag(count: *mut std::ffi::c_void, tag: i64);
    fn ftx_saved_count_close(count: *mut std::ffi::c_void);
    fn ftx_saved_count_len(count: *mut std::ffi::c_void) -> i64;
    #[allow(clippy::too_many_arguments)]
    fn ftx_saved_count_entry(count: *mut std::ffi::c_void, i: i64, tag: *mut i64, nbytes: *mut i64, dtype: *mut i8, sizes: *mut i64, max_dims: i64, ndims: *mut i64) -> i32;
    fn ftx_saved_count_free(count: *mut std::ffi::c_void);
}

impl SavedCount {
    /// Starts counting on this thread, the storages of `exclude` left out.
    #[cfg(ftx_torch_shim)]
    pub fn open(exclude: &[&Tensor]) -> Result<SavedCount, SavedCountError> {
        let ptrs: Vec<*const std::ffi::c_void> = exclude.iter().map(|t| t.as_ptr() as *const std::ffi::c_void).collect();
        // SAFETY: live tch tensors (at::Tensor*), read during the call only.
        let handle = unsafe { ftx_saved_count_open(ptrs.as_ptr(), ptrs.len() as i64) };
        if handle.is_null() {
            return Err(SavedCountError::AlreadyOpen);
        }
        Ok(SavedCount { handle })
    }

    /// Without the shim there is nothing to count with.
    #[cfg(not(ftx_torch_shim))]
    pub fn open(_exclude: &[&Tensor]) -> Result<SavedCount, SavedCountError> {
        Err(SavedCountError::NoShim)
    }

    /// Records tensors saved from now on under `tag`.
    pub fn tag(&self, tag: i64) {
        #[cfg(ftx_torch_shim)]
        // SAFETY: `handle` is this count's, open until dropped.
        unsafe {
            ftx_saved_count_tag(self.handle, tag)
        };
        #[cfg(not(ftx_torch_shim))]
        let _ = tag;
    }

    /// Stops counting and returns the storages still kept (call it while the graph is alive:
    /// a storage freed by then is not counted).
    pub fn finish(self) -> Vec<SavedTensor> {
        let mut out = Vec::new();
        #[cfg(ftx_torch_shim)]
        // SAFETY: `handle` is this count's; each entry is read into buffers of the sizes given.
        unsafe {
            ftx_saved_count_close(self.handle);
            for i in 0..ftx_saved_count_len(self.handle) {
                let (mut tag, mut nbytes, mut dtype, mut ndims) = (0i64, 0i64, 0i8, 0i64);
                let mut sizes = [0i64; 8];
                if ftx_saved_count_entry(self.handle, i, &mut tag, &mut nbytes, &mut dtype, sizes.as_mut_ptr(), sizes.len() as i64, &mut ndims) == 1 {
                    let kind = kind_of(dtype);
                    out.push(SavedTensor { tag, bytes: nbytes as u64, shape: sizes[..(ndims as usize).min(8)].to_vec(), kind });
                }
            }
        }
        out
    }
}

impl Drop for SavedCount {
    fn drop(&mut self) {
        #[cfg(ftx_torch_shim)]
        // SAFETY: `handle` came from `ftx_saved_count_open` and is freed once, here.
        unsafe {
            ftx_saved_count_free(self.handle)
        };
    }
}

/// The tensors `model`'s training forward pass over `batch` (no checkpointing) keeps for
/// backward, each tagged with the layer that first saved it (`layers` for the final norm's;
/// the LM head and loss are not run). `trainable` are the run's trainable tensors (adapters),
/// left out with the model's weights and the rotary tables and masks.
pub fn saved_by_layer(model: &CausalLm, batch: &Batch, trainable: &[Tensor]) -> Result<Vec<SavedTensor>, SavedCountError> {
    let inp = model.attn_inputs(&batch.positions, |w| batch.mask(w));
    let weights: Vec<Tensor> = model.named_tensors().into_iter().map(|(_, t)| t).collect();
    let mut exclude: Vec<&Tensor> = weights.iter().chain(trainable).collect();
    exclude.extend(span_tensors(&inp));
    let count = SavedCount::open(&exclude)?;
    let mut h = model.embed(&batch.input_ids);
    for (l, layer) in model.layers.iter().enumerate() {
        count.tag(l as i64);
        h = layer.forward(&h, &inp, None, true);
    }
    count.tag(model.layers.len() as i64);
    let last = model.norm.forward(&h);
    let saved = count.finish();
    drop((h, last));
    Ok(saved)
}

/// The rotary tables and masks of `inp` (built before the layers, shared by all of them).
fn span_tensors(inp: &AttnInputs) -> Vec<&Tensor> {
    let mut out = Vec::new();
    for span in [&inp.full, &inp.sliding].into_iter().flatten() {
        out.extend([&span.cos, &span.sin]);
        if let AttnMask::Explicit(m) = &span.mask {
            out.push(m);
        }
    }
    out
}

/// Bytes first saved under `tag`.
pub fn bytes_of(saved: &[SavedTensor], tag: i64) -> u64 {
    saved.iter().filter(|s| s.tag == tag).map(|s| s.bytes).sum()
}

/// libtorch's ScalarType code as a [`Kind`] (the ones activations come in; bytes otherwise).
#[cfg_attr(not(ftx_torch_shim), allow(dead_code))]
fn kind_of(code: i8) -> Kind {
    match code {
        1 => Kind::Int8,
        3 => Kind::Int,
        4 => Kind::Int64,
        5 => Kind::Half,
        6 => Kind::Float,
        7 => Kind::Double,
        11 => Kind::Bool,
        15 => Kind::BFloat16,
        _ => Kind::Uint8,
    }
}
