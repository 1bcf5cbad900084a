from django.contrib import admin

from reviewapp.ingest.models import IngestBatch, Item, SchemaVersion, Source


@admin.register(Source)
class SourceAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "id_field", "label_field", "created_at")
    readonly_fields = ("created_at",)


@admin.register(SchemaVersion)
class SchemaVersionAdmin(admin.ModelAdmin):
    list_display = ("source", "major", "minor", "created_at")
    readonly_fields = [f.name for f in SchemaVersion._meta.fields]


@admin.register(IngestBatch)
class IngestBatchAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "filename", "status", "accepted", "rejected", "duplicates", "created_at")
    list_filter = ("status", "source")
    readonly_fields = [f.name for f in IngestBatch._meta.fields]


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = ("id", "source", "external_id", "state", "received_at")
    list_filter = ("state", "source")
    search_fields = ("external_id",)
    readonly_fields = [f.name for f in Item._meta.fields]
