"""Interfaces the deploy artefacts use that other issues define but main does not have yet.

Each entry is removed when its code lands: the tests assert every entry is *still* missing
(so landing code makes a test fail and forces the artefacts to be aligned to the real names),
and tolerate only these entries in the meantime.
"""

# target-server serve flags (issue 3: auth). Used by deploy/k8s, deploy/compose, deploy/ray.
SERVER_FLAGS = {"--auth-token-file": "issue 3 (bearer token on gRPC and Flight)"}

# TrainConfig keys (dotted) used in deploy/k8s and deploy/compose trainer configs.
TRAIN_KEYS = {"targets.auth_token_file": "issue 7/8 (trainer side of the bearer token)"}

# Trainer metrics (issue 7/8, prefix specrelay_trainer_) that the rules and the dashboard use.
# The names follow the issues' wording; draft_trainer/metrics.py does not exist on main yet.
# Once ANY specrelay_trainer_ metric is defined in the code, this set must be emptied and the
# rules/dashboard aligned to the real names (tests/deploy/test_grafana.py enforces it).
TRAINER_METRICS = {
    "specrelay_trainer_tokens_total",             # demand: tokens trained on
    "specrelay_trainer_data_wait_seconds_total",  # time blocked on features
    "specrelay_trainer_samples_consumed_total",
    "specrelay_trainer_samples_dropped_total",    # label: reason
    "specrelay_trainer_steps_total",
    "specrelay_trainer_loss",
    "specrelay_trainer_accuracy",                 # label: position (TTT step)
    "specrelay_trainer_endpoint_up",              # label: endpoint
    "specrelay_trainer_request_seconds_bucket",   # label: endpoint (histogram)
}
