from django.urls import path

from reviewapp.observability import api

urlpatterns = [
    path("decisions/<int:pk>/trail/", api.DecisionTrailApi.as_view(), name="api-decision-trail"),
]
