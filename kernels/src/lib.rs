//! ftx compute kernels.
//!
//! Today: the quantisation code books shared by every NF4 path (QLoRA storage, export),
//! written to match bitsandbytes value for value. CUDA versions of the hot kernels will sit
//! beside their CPU references here.

pub mod nf4;
