"""SpecRelay on a Ray cluster: target servers as GPU actors, the trainer pool via Ray Train.

    python -m deploy.ray.launch --help

Not part of the installed packages (the `ray` extra is optional); run from a checkout or an
image that contains the repository.
"""
