//! 1.0 when the completion parses as a JSON object, 0.5 for other JSON values, else 0.0.

use ftx_plugin_api::reward::{export_reward, Reward, Sample};

struct JsonValid;

impl Reward for JsonValid {
    fn score(samples: Vec<Sample>) -> Vec<f32> {
        samples
            .iter()
            .map(|s| match serde_json::from_str::<serde_json::Value>(s.completion.trim()) {
                Ok(serde_json::Value::Object(_)) => 1.0,
                Ok(_) => 0.5,
                Err(_) => 0.0,
            })
            .collect()
    }
}

export_reward!(JsonValid);
