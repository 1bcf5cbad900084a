from django.apps import AppConfig
from django.db.models.signals import post_migrate


class CoreConfig(AppConfig):
    name = "reviewapp.core"
    label = "core"
    verbose_name = "reviewapp core"

    def ready(self) -> None:
        from reviewapp.core.roles import ensure_role_groups

        # Groups need the permissions, which Django creates in its own post_migrate handler.
        post_migrate.connect(ensure_role_groups, dispatch_uid="reviewapp.ensure_role_groups")
