"""Feature views: user and item attributes, user x scenario engagement, item x scenario stats, title embedding."""

from _mtrec import OBJECTS

user_attributes = OBJECTS["user_attributes"]
item_attributes = OBJECTS["item_attributes"]
user_scenario_engagement = OBJECTS["user_scenario_engagement"]
item_scenario_stats = OBJECTS["item_scenario_stats"]
item_text_embedding = OBJECTS["item_text_embedding"]
