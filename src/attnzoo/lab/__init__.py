"""Experiments on the attnzoo.nn head structures: TransMLA conversion of a real checkpoint
(`attnzoo transmla`) and tiny language models trained on CPU (`attnzoo train-tiny`)."""
