//! Any bytes → `EfficientNet::from_safetensors_bytes`: an error or a model, never a panic, abort
//! or out-of-bounds access. A model that loads must report the shape its weights imply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use phenocore::models::efficientnet::{EfficientNet, Padding};

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = EfficientNet::from_safetensors_bytes(data, Padding::Symmetric, 1e-5) {
        let cfg = model.config();
        assert!(cfg.in_channels >= 1 && cfg.num_classes >= 1, "{cfg:?}");
        assert_eq!(model.layer_dim("top_activation").ok(), Some(1280));
    }
});
