"""One volume in, one mask out: resampling, sliding windows, network runtimes, the segmenter."""
