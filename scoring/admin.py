from django.contrib import admin

from scoring.models import ModelVersion


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("source", "version", "algorithm", "status", "is_champion", "is_shadow", "trigger", "created_at")
    list_filter = ("status", "source")
    readonly_fields = [f.name for f in ModelVersion._meta.fields]
