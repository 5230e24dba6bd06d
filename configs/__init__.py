"""The presets (`appleslm train tiny`): installed as the package data of `appleslm.configs`."""
