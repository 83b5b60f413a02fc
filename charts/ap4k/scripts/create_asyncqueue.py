"""Create the example AsyncQueue once its CRD is served (the chart's post-install hook Job).

Helm could create the AsyncQueue itself only if its kind were known before the release is
installed, and the CRD comes with this very release (templates/crds/): Helm's discovery cache
would not know the kind yet. So a Job creates it through the API, retrying while the API
server does not serve the kind. An AsyncQueue that already exists is left as it is (users
edit it with kubectl).

Input: the AsyncQueue as JSON in AP4K_EXAMPLE_ASYNCQUEUE. Runs in the ap4k image, which ships
the `kubernetes` client; in-cluster credentials, or a kubeconfig outside a cluster.
"""

import json
import os
import sys
import time

from kubernetes import client, config

GROUP, VERSION, PLURAL = "ap4k.dev", "v1alpha1", "asyncqueues"


def main() -> int:
    body = json.loads(os.environ["AP4K_EXAMPLE_ASYNCQUEUE"])
    timeout = float(os.environ.get("AP4K_EXAMPLE_TIMEOUT_SECONDS", "300"))
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    api = client.CustomObjectsApi()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except client.ApiException as exc:
            if exc.status == 409:
                print(f"asyncqueue {namespace}/{name} exists already: left as it is")
                return 0
            if exc.status == 404 and time.monotonic() < deadline:
                # The CRD is not established yet (or the kind not yet served).
                print(f"asyncqueues.{GROUP} not served yet, retrying", flush=True)
                time.sleep(2)
                continue
            print(f"creating asyncqueue {namespace}/{name} failed: {exc}", file=sys.stderr)
            return 1
        print(f"asyncqueue {namespace}/{name} created")
        return 0


if __name__ == "__main__":
    sys.exit(main())
