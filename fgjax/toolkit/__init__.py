"""The competition toolkit (issue 19; spec section 8): attention-region crops (`crops`), test-time
augmentation (`tta`), pseudo-labels (`pseudo_labels`), error analysis (`analysis`) and
submissions (`submission`). Each module stands alone; run.py's modes and `fgjax.tools.ensemble`
are built on them and on `fgjax.train.evaluation`'s predict helpers."""
