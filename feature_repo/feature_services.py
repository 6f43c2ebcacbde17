"""The versioned contract the ranker reads: training and batch scoring both retrieve through it."""

from _mtrec import OBJECTS

mtrec_ranker_v1 = OBJECTS["mtrec_ranker_v1"]
