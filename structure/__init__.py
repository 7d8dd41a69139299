"""Model structure: where things are in each model family (`architectures`, one declarative table) and the
block-by-block driver that calibration-based methods share (`blockwise`). Builds on `core` only."""
