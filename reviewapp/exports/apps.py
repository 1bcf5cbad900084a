from django.apps import AppConfig


class ExportsConfig(AppConfig):
    name = "reviewapp.exports"
    label = "exports"
