// /docs: Swagger UI (shipped in the swagger-ui-py wheel) over the server's /openapi.json.
"use strict";
window.addEventListener("load", () => {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,  // the default would call an outside validator service
    // The console's token, when one was given there, so that "Try it out" works at once.
    requestInterceptor: (request) => {
      const token = localStorage.getItem("ap4k-console-token");
      if (token && !request.headers.Authorization) request.headers.Authorization = `Bearer ${token}`;
      return request;
    },
  });
});
