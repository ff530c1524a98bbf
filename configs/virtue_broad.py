"""Virtue-ethics constitution, broad scope."""

from configs.base import get_config as base_config


def get_config():
    config = base_config()
    config.constitution = "virtue_ethics"
    config.scope = "broad"
    return config
