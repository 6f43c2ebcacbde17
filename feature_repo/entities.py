"""Entities: user, item and scenario (join keys user_id, item_id, scenario)."""

from _mtrec import OBJECTS

user = OBJECTS["user"]
item = OBJECTS["item"]
scenario = OBJECTS["scenario"]
