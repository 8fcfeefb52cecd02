"""`ptkernels demo`: prompt tuning on a real pretrained model, offline (see ``run``)."""
