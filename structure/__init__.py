"""Model structure: where things are in each model family (`architectures`, one declarative table), where a model's
weights live (`streaming`: in memory, or streamed from safetensors one block at a time), the one walk over the
decoder blocks (`pipeline`) with what a block sees in a calibrated pass (`blockwise`), the layer-by-layer forward
(`layerwise`) and the output head in chunks (`head`). Builds on `core` only."""
