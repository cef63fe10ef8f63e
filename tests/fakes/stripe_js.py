"""A Stripe.js stand-in that `FakeStripe` serves, for browser tests of the add-card page.

It keeps Stripe.js's shape and its security property: `Stripe(key).elements().create("card")`
mounts a frame served from the fake's own origin, where the card is typed; and
`stripe.confirmCardSetup(clientSecret, {payment_method: {card}})` asks that frame (by
postMessage) to create the payment method with the publishable key and confirm the
SetupIntent, answering `{setupIntent}` or `{error}`. The page that mounts it never sees the
card number, only the `pm_` id, exactly as with the real Stripe.js.

| GET /v3/                 | the library (what `https://js.stripe.com/v3/` serves)   |
| GET /v3/elements/card    | the card frame                                          |
| GET /v3/elements/card.js | the frame's script                                      |
"""

from __future__ import annotations

LIBRARY = r"""(function () {
  "use strict";
  var origin = new URL(document.currentScript.src).origin;
  function Stripe(key) {
    var frame = null;
    var waiting = null;
    window.addEventListener("message", function (event) {
      if (event.origin !== origin || !frame || event.source !== frame.contentWindow) {
        return;
      }
      if (waiting) {
        var done = waiting;
        waiting = null;
        done(event.data);
      }
    });
    return {
      elements: function () {
        return {
          create: function (type) {
            return {
              mount: function (where) {
                var host = typeof where === "string" ? document.querySelector(where) : where;
                frame = document.createElement("iframe");
                frame.src = origin + "/v3/elements/" + type + "?key=" + encodeURIComponent(key);
                frame.title = "Secure card payment input frame";
                frame.name = "stripe-card-frame";
                host.appendChild(frame);
              }
            };
          }
        };
      },
      confirmCardSetup: function (clientSecret) {
        return new Promise(function (resolve) {
          waiting = resolve;
          frame.contentWindow.postMessage(
            { type: "confirmCardSetup", clientSecret: clientSecret }, origin
          );
        });
      }
    };
  }
  window.Stripe = Stripe;
})();
"""

CARD_FRAME = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Card</title>
<style>
body { margin: 0; font: 15px system-ui, sans-serif; }
label { display: block; margin: .2rem 0 0; }
input { font: inherit; padding: .3rem; width: 100%; box-sizing: border-box; }
.row { display: flex; gap: .5rem; }
</style></head>
<body>
<label for="number">Card number</label>
<input id="number" name="cardnumber" autocomplete="cc-number" inputmode="numeric">
<div class="row">
<div><label for="expiry">MM / YY</label>
<input id="expiry" name="exp-date" autocomplete="cc-exp"></div>
<div><label for="cvc">CVC</label>
<input id="cvc" name="cvc" autocomplete="cc-csc" inputmode="numeric"></div>
</div>
<script src="/v3/elements/card.js"></script>
</body></html>
"""

CARD_SCRIPT = r"""(function () {
  "use strict";
  var key = new URLSearchParams(location.search).get("key");
  function post(path, fields) {
    return fetch(path, {
      method: "POST",
      headers: {
        "Authorization": "Bearer " + key,
        "Content-Type": "application/x-www-form-urlencoded"
      },
      body: new URLSearchParams(fields).toString()
    }).then(function (answer) { return answer.json(); });
  }
  function value(id) { return document.getElementById(id).value.replace(/\s+/g, ""); }
  window.addEventListener("message", function (event) {
    if (event.source !== window.parent || !event.data || event.data.type !== "confirmCardSetup") {
      return;
    }
    function reply(answer) { event.source.postMessage(answer, event.origin); }
    var expiry = value("expiry").split("/");
    var secret = String(event.data.clientSecret);
    post("/v1/payment_methods", {
      "type": "card",
      "card[number]": value("number"),
      "card[exp_month]": expiry[0] || "",
      "card[exp_year]": expiry[1] ? "20" + expiry[1] : "",
      "card[cvc]": value("cvc")
    }).then(function (method) {
      if (method.error) {
        reply({ error: method.error });
        return null;
      }
      return post("/v1/setup_intents/" + secret.split("_secret_")[0] + "/confirm", {
        "payment_method": method.id,
        "client_secret": secret
      }).then(function (intent) {
        reply(intent.error ? { error: intent.error } : { setupIntent: intent });
      });
    }).catch(function () {
      reply({ error: { message: "Stripe could not be reached." } });
    });
  });
})();
"""

ASSETS = {
    "/v3/": ("application/javascript; charset=utf-8", LIBRARY),
    "/v3/elements/card": ("text/html; charset=utf-8", CARD_FRAME),
    "/v3/elements/card.js": ("application/javascript; charset=utf-8", CARD_SCRIPT),
}
