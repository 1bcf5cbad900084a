from django.contrib import admin

from reviewapp.review.models import Decision, Label, Policy, ReviewTask, Verdict


@admin.register(Policy)
class PolicyAdmin(admin.ModelAdmin):
    """Policies are changed through the app (each save is a new version); the admin only shows them."""

    list_display = ("source", "version", "mode", "qa_sample_rate", "created_by", "created_at")
    readonly_fields = [f.name for f in Policy._meta.fields]


@admin.register(ReviewTask)
class ReviewTaskAdmin(admin.ModelAdmin):
    list_display = ("id", "item", "kind", "state", "claimed_by", "lease_expires_at")
    list_filter = ("state", "kind")
    readonly_fields = [f.name for f in ReviewTask._meta.fields]


for model in (Verdict, Decision, Label):
    admin.site.register(model, list_display=("id", "item", "label", "created_at"),
                        readonly_fields=[f.name for f in model._meta.fields])
