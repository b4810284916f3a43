"""One module per stage, each what one ``jobs/`` script and one CLI command run: classify
(stage 1), label (stage 2), segment (stage 3), nightly, and the demo that chains them."""
