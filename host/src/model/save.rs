//! Writing a model as a Hugging Face checkpoint folder.

use super::CausalLm;
use std::path::Path;

impl CausalLm {
    /// Writes `dir/model.safetensors` with the current weights, and copies config, tokenizer
    /// and generation files from `source` (the folder the model was loaded from).
    pub fn save_pretrained(&self, source: &Path, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        // The source was loaded already, so a Hub id resolves from this process's memo.
        let source = &crate::hub::resolve_model(source).map_err(std::io::Error::other)?;
        let tensors = self.named_tensors();
        crate::model::weights::write_safetensors(&dir.join("model.safetensors"), &tensors)?;
        let tokenizer_files = crate::model::tokenizer::TOKENIZER_FILES.iter();
        for f in ["config.json", "generation_config.json"].iter().chain(tokenizer_files) {
            let src = source.join(f);
            if src.exists() {
                crate::util::write_atomic(&dir.join(f), &std::fs::read(&src)?)?;
            }
        }
        Ok(())
    }
}
