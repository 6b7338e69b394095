//! Issue 13, item 3: a loss that training cannot differentiate is the plugin's error, named,
//! never a libtorch panic.

use super::{both, hostile_loss, logged_loss, train_with};

#[test]
fn constant_detached_and_stale_losses_are_errors_naming_the_plugin_and_what_it_returned() {
    let _rng = crate::common::torch_rng_lock();
    let home = tempfile::tempdir().unwrap();
    let cases = [
        ("attack = 3", 1, "returned a loss that does not require grad (value 1,"),
        ("attack = 4", 1, "returned a loss that does not require grad (value "),
        // The first step's loss, returned again at the second: its graph was freed by backward.
        ("attack = 5", 2, "used a tensor handle kept from an earlier call"),
    ];
    for (params, steps, want) in cases {
        let work = tempfile::tempdir().unwrap();
        let run = train_with(home.path(), work.path(), &hostile_loss(), params, steps);
        let out = both(&run);
        assert_eq!(run.status.code(), Some(1), "{params}: {out}");
        assert!(out.contains("plugin hostile_loss: compute: ") && out.contains(want), "{params}: {out}");
        assert!(!out.contains("panicked") && !out.contains("does not require grad and does not have a grad_fn"), "{params}: {out}");
    }
    // The same plugin, honest, trains through the same path.
    let work = tempfile::tempdir().unwrap();
    let run = train_with(home.path(), work.path(), &hostile_loss(), "attack = 0", 2);
    assert!(run.status.success(), "{}", both(&run));
    assert!(logged_loss(work.path(), 2).is_finite());
}
