"""Moving bytes: a segment's Context Bank (`bank`: every prompt row of its sparse layers, host
memory on an accelerator), the prompt writer that fills it (`prompt`), the gather strategies that
load the selected rows into the device working buffer (`gathers`, chosen in `choose_gather`), the
segment that wires them (`segment`), the `Transfer` interface every copy, stream and event goes
through (`transfer`: inline, CUDA, simulated), and the partial reload's delta (`delta`)."""
