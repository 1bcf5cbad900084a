from typing import Any

from django.http import HttpRequest

from reviewapp.core.roles import can


def roles(request: HttpRequest) -> dict[str, Any]:
    user = request.user
    return {
        "caps": {
            name: can(user, name)
            for name in (
                "review_items",
                "adjudicate",
                "manage_sources",
                "ingest_data",
                "manage_policies",
                "manage_models",
                "export_labels",
            )
        }
    }
