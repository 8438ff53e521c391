"""Projects, jobs, Ray execution and the Hypha service: filled by the Ray and service issues."""
