"""Moving bytes: the Context Bank (every prompt row of a segment's sparse layers, host memory on an
accelerator), the `Transfer` interface every copy, stream and event goes through (inline, CUDA,
simulated), and the partial reload's delta."""
