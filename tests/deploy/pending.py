"""Interfaces the deploy artefacts use that other issues define but main does not have yet.

Each entry is removed when its code lands: the tests assert every entry is *still* missing
(so landing code makes a test fail and forces the artefacts to be aligned to the real names),
and tolerate only these entries in the meantime.
"""

# target-server serve flags (issue 3: auth). Used by deploy/k8s, deploy/compose, deploy/ray.
SERVER_FLAGS = {"--auth-token-file": "issue 3 (bearer token on gRPC and Flight)"}

# TrainConfig keys (dotted) used in deploy/k8s and deploy/compose trainer configs.
TRAIN_KEYS = {"targets.auth_token_file": "issue 7/8 (trainer side of the bearer token)"}
