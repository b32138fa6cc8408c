"""Interaction data: loaders, the leave-one-out split, padding, and a synthetic generator."""
from recjpq.data.loaders import FORMATS, DataFormatError, SequenceData, from_sequences, load_interactions
from recjpq.data.split import (PAD, EvalSet, LeaveOneOut, batches, leave_one_out, length_batches, pad_left,
                               train_interactions)
from recjpq.data.synthetic import generate_sequences

__all__ = ["FORMATS", "DataFormatError", "SequenceData", "from_sequences", "load_interactions", "PAD",
           "EvalSet", "LeaveOneOut", "batches", "leave_one_out", "length_batches", "pad_left", "train_interactions",
           "generate_sequences"]
