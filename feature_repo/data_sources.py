"""Sources: warehouse exports of attributes, daily feature snapshots and title embeddings."""

from _mtrec import OBJECTS

user_attributes_source = OBJECTS["user_attributes"].batch_source
item_attributes_source = OBJECTS["item_attributes"].batch_source
user_scenario_engagement_source = OBJECTS["user_scenario_engagement"].batch_source
item_scenario_stats_source = OBJECTS["item_scenario_stats"].batch_source
item_text_embedding_source = OBJECTS["item_text_embedding"].batch_source
