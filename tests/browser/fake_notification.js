// Stands in for the browser's Notification API (headless Chromium shows none): records what
// the page would show, so a test can assert which mentions and private messages notify.
(() => {
  window.__notifications = [];
  class FakeNotification {
    constructor(title, options) {
      window.__notifications.push([title, (options && options.body) || ""]);
    }
    addEventListener() {}
    close() {}
  }
  FakeNotification.permission = "granted";
  FakeNotification.requestPermission = () => Promise.resolve("granted");
  Object.defineProperty(window, "Notification", { value: FakeNotification, configurable: true });
})();
