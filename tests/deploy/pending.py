"""Interfaces the deploy artefacts use that other issues define but main does not have yet.

Each entry is removed when its code lands: the tests assert every entry is *still* missing
(so landing code makes a test fail and forces the artefacts to be aligned to the real names),
and tolerate only these entries in the meantime.
"""

# target-server serve flags (issue 3: auth). Used by deploy/k8s, deploy/compose, deploy/ray.
SERVER_FLAGS = {"--auth-token-file": "issue 3 (bearer token on gRPC and Flight)"}

# The trainers' DNS re-resolution interval for dns: endpoints (issue 7: targets.refresh_interval_s,
# 10 s by default on the pool branch). Used until TargetsConfig has the field.
DNS_REFRESH_S = 10.0

# TrainConfig keys (dotted) used in deploy/k8s and deploy/compose trainer configs.
TRAIN_KEYS = {
    "targets.auth_token_file": "issue 3/7 (trainer side of the bearer token)",
    "metrics_host": "issue 7/8 (trainer /metrics bind address; pods need 0.0.0.0)",
    "metrics_port": "issue 7/8 (trainer /metrics port; base port + local rank per issue 8)",
}

# Trainer metrics (prefix specrelay_trainer_) that the rules and the dashboard use, not on main yet.
# Issue 7 names are the ones the pool branch defines in draft_trainer/metrics.py (TrainerMetrics);
# issue 8 names follow the wording. Each entry must still be missing from the code: once
# it is defined, tests/deploy/test_grafana.py fails until it is removed from this set.
TRAINER_METRICS = {
    # issue 7 (target pool): as defined on the pool branch
    "specrelay_trainer_data_wait_seconds_total": "issue 7",
    "specrelay_trainer_samples_consumed_total": "issue 7",
    "specrelay_trainer_samples_dropped_total": "issue 7",      # label: reason
    "specrelay_trainer_endpoints": "issue 7",                  # label: state (joining/up/down/refused/draining)
    "specrelay_trainer_endpoint_inflight_tokens": "issue 7",   # label: endpoint
    "specrelay_trainer_request_seconds_bucket": "issue 7",
    "specrelay_trainer_retries_total": "issue 7",              # label: reason
    "specrelay_trainer_failovers_total": "issue 7",
    # issue 8 (distributed trainer): names from the wording, to be aligned when it lands
    "specrelay_trainer_tokens_total": "issue 8",               # demand: tokens trained on
    "specrelay_trainer_steps_total": "issue 8",
    "specrelay_trainer_loss": "issue 8",
    "specrelay_trainer_accuracy": "issue 8",                   # label: position (TTT step)
}
