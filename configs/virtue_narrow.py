"""Virtue-ethics constitution, narrow scope."""

from configs.base import get_config as base_config


def get_config():
    config = base_config()
    config.constitution = "virtue_ethics"
    config.scope = "narrow"
    return config
