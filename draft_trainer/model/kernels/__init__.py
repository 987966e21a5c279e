"""GPU kernels (Triton). Imported lazily: the core never imports triton at start-up."""
