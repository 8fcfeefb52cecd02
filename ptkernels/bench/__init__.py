"""`ptkernels bench`: kernel microbenchmarks and end-to-end training steps (see ``run``)."""
